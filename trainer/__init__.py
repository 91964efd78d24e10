"""depth2d trainer: seed depth networks with a custom tf.distribute loop."""
