#!/bin/sh
# Starts Melter in the worker image.
#   worker [OPTIONS]   `melter worker`: MELTER_CONCURRENCY pool processes (default 1), named
#                      MELTER_WORKER_NAME (default melter@<container hostname>)
#   flower | serve ... `melter flower` / `melter serve` with the given options
#   anything else      run as a command (a shell, `melter submit`, ...)
# Farm settings come from MELTER_* variables; their *_FILE forms (Docker secrets) are read by
# Melter itself. MELTER_API_TOKEN_FILE is turned into MELTER_API_TOKEN here for `melter serve`.
set -eu
if [ -n "${MELTER_API_TOKEN_FILE:-}" ]; then
    MELTER_API_TOKEN=$(cat "$MELTER_API_TOKEN_FILE")
    export MELTER_API_TOKEN
    unset MELTER_API_TOKEN_FILE
fi
command=${1:-worker}
[ "$#" -gt 0 ] && shift
case "$command" in
    worker)
        exec melter worker --concurrency "${MELTER_CONCURRENCY:-1}" \
            --hostname "${MELTER_WORKER_NAME:-melter@$(hostname)}" "$@" ;;
    flower|serve)
        exec melter "$command" "$@" ;;
    *)
        exec "$command" "$@" ;;
esac
