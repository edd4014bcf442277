"""The service around the farm: Janus event handler endpoint, folder watcher, jobs API,
status callbacks and metrics (``melter serve``, ``melter watch``)."""
