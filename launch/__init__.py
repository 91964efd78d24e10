"""Launch tools: Vertex AI custom jobs, TPU VMs and Cloud Storage staging."""
