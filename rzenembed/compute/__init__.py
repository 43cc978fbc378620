"""Where a step runs, in one place.

- ``steps``: the decision (this process, or a Ray Job on the cluster) and the Ray tasks a
  step starts for its model work;
- ``jobs`` / ``job_main``: long steps as Ray Jobs that outlive the process that submitted
  them, found again by their step's key, answering through the storage root;
- ``admission``: a request checked against what the cluster has free, waited for, or
  refused naming who holds the resources;
- ``waiting``: progress lines and ``StepTimeout`` for Ray work;
- ``connect``: joining a cluster, a Ray Client connection, or a local runtime.

The device a process computes on is ``rzenembed.runtime``'s business.
"""
