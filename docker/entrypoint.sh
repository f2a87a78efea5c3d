#!/bin/sh
# Container entrypoint: make sure the weights are in the volume, then become the server.
# Arguments are `janus-server serve` flags (or a `check` or `download` command); settings otherwise
# come from JANUS_* variables.
set -eu

# `check` (the self-check on this machine's device) and `download` run as they are, nothing else first.
case "${1:-}" in
    check | download) exec janus-server "$@" ;;
esac

model="${JANUS_MODEL:-deepseek-ai/Janus-1.3B}"
case "$(printf '%s' "${JANUS_OFFLINE:-}" | tr '[:upper:]' '[:lower:]')" in
    1 | true | yes | on) offline=1 ;;
    *) offline=0 ;;
esac

# Flags win over the environment in the server, so they must here too.
previous=""
for arg in "$@"; do
    if [ "$previous" = "--model" ]; then
        model="$arg"
    fi
    case "$arg" in
        --model=*) model="${arg#--model=}" ;;
        --offline) offline=1 ;;
        --no-offline) offline=0 ;;
    esac
    previous="$arg"
done

# A folder of one's own weights needs no download, and offline means no network at all.
# `download` returns at once when the model is already complete in $JANUS_HOME.
if [ "$offline" = 0 ] && [ ! -d "$model" ]; then
    janus-server download --model "$model"
fi

# exec: the server replaces this shell, so the SIGTERM from tini reaches it and it drains.
exec janus-server serve "$@"
