"""`python -m pipeline.viewer RUN_DIR [--port N] [--host H] [--max-upload-mb M] [--no-model]`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from pipeline.errors import PipelineError

logger = logging.getLogger("pipeline.viewer")


def _stop(signum, frame):
    raise KeyboardInterrupt  # SIGTERM stops the server as Ctrl-C does: sockets closed, exit 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.viewer",
                                     description="Browse a finished run directory live: activations, units, "
                                                 "deconv / guided backprop, and the run's stored pictures.")
    parser.add_argument("run_dir", help="a run directory (the one holding results.h5)")
    parser.add_argument("--port", type=int, default=8765, help="port (0: any free one); default 8765")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; default 127.0.0.1 (this machine only)")
    parser.add_argument("--max-upload-mb", type=float, default=16, help="largest uploaded file; default 16")
    parser.add_argument("--no-model", action="store_true", help="do not load the model: stored pictures only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    if not 0 <= args.port <= 65535 or args.max_upload_mb <= 0:
        print("error: --port must be 0..65535 and --max-upload-mb positive", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: anyone who can reach this address can browse the run and upload images",
                       args.host)

    from pipeline.viewer.server import Viewer, serve

    try:
        viewer = Viewer(args.run_dir, args.max_upload_mb, live=not args.no_model)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _stop)
    try:
        serve(viewer, args.host, args.port, ready=lambda url: logger.info("viewer at %s (Ctrl-C stops it)", url))
    except KeyboardInterrupt:
        logger.info("viewer stopped")
    except OSError as err:
        print(f"error: cannot listen on {args.host}:{args.port} ({err.strerror or err}): choose another --port",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
