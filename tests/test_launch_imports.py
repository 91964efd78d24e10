"""launch/ stays free of TensorFlow: the launchers run where it is not installed."""

import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("module", ["launch.stage", "launch.vertex", "launch.gcs_sync"])
def test_launch_modules_do_not_import_tensorflow(module):
  # A fresh interpreter: this test process may have imported TensorFlow already.
  code = (f"import sys, {module}\n"
          "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow')\n"
          "print(loaded[:5])\n"
          "sys.exit(1 if loaded else 0)\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr
