"""The online adaptation loop: traffic store, gate, worker, version watcher (numpy only;
the worker imports the training stack inside its process)."""
