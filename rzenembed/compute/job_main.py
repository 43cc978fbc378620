"""The driver of a step's Ray Job: ``python -m rzenembed.compute.job_main <job folder>``.

Reads ``spec.pkl`` from the job's folder on the storage root (written by
``rzenembed.compute.jobs.JobRunner``), joins the cluster the job runs in, calls the step's
function and writes ``result.pkl``, or ``error.pkl`` (the exception and its traceback) and
exits 1. The submitting process reads the answer from storage, never from a connection.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from rzenembed.data.folders import write_bytes
from rzenembed.data.storage import join


def _pickled_error(error: BaseException, trace: str) -> bytes:
    import cloudpickle

    try:
        data = cloudpickle.dumps((error, trace))
        cloudpickle.loads(data)  # some pickle but cannot be rebuilt (required arguments)
        return data
    except Exception:  # one that does not travel: its type name and message
        return cloudpickle.dumps((RuntimeError(f"{type(error).__name__}: {error}"), trace))


def main(argv: list[str] | None = None) -> int:
    import cloudpickle
    import ray

    from rzenembed.compute.jobs import JOB_ENV, _read

    parser = argparse.ArgumentParser(prog="rzenembed.compute.job_main")
    parser.add_argument("folder", help="the job's folder on the storage root")
    parser.add_argument("--endpoint-url", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # This process is a step's job: every step it calls runs here (a job never submits
    # another). Set here rather than through a runtime environment, which costs each job
    # a round trip to the runtime-env agent.
    os.environ[JOB_ENV] = args.folder.rstrip("/").rsplit("/", 1)[-1]
    spec = cloudpickle.loads(_read(join(args.folder, "spec.pkl"), args.endpoint_url))
    print(f"rzenembed job: {spec['step']} (key {spec['key']})", flush=True)
    # The cluster this job runs in (RAY_ADDRESS, set by the job server): every library
    # call below finds Ray initialised and never connects anywhere else.
    ray.init(log_to_driver=False, configure_logging=False)
    try:
        result = spec["fn"](*spec["args"], **spec["kwargs"])
    except BaseException as error:
        trace = traceback.format_exc()
        print(trace, file=sys.stderr, flush=True)
        write_bytes(join(args.folder, "error.pkl"), _pickled_error(error, trace), args.endpoint_url)
        return 1
    write_bytes(join(args.folder, "result.pkl"), cloudpickle.dumps(result), args.endpoint_url)
    print(f"rzenembed job: {spec['step']} done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
