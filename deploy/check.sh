#!/usr/bin/env bash
# Validates deploy/ with the external tools that are installed (each one missing is reported, not faked):
#   systemd-analyze verify + security   relay.service
#   promtool check rules / test rules   prometheus/relay-alerts.yml, prometheus/relay-alerts.test.yml
#   ShellCheck (lint)                    pg-backup.sh, smoke-test.sh, check.sh
#   docker compose config                compose.yaml (the compose plugin, else docker-compose v1; no engine needed)
# The suite's own checks of these files: tests/test_deploy_files.py and tests/test_deploy_backup.py.
set -uo pipefail
cd "$(dirname "$0")" || exit 1
status=0
missing=()
run() { echo "== $*"; "$@" || status=1; }

if command -v systemd-analyze > /dev/null; then
    unit=relay.service
    if [ ! -x /opt/relay/bin/relay ]; then
        # verify checks that ExecStart exists: point it at this checkout's relay for the check.
        relay_bin=$(command -v relay || echo ../.venv/bin/relay)
        unit=$(mktemp -d)/relay.service
        sed "s#/opt/relay/bin/relay#$(realpath "$relay_bin")#" relay.service > "$unit"
    fi
    run systemd-analyze verify "$unit"
    run systemd-analyze security --offline=yes --threshold=3 "$unit" --no-pager
else
    missing+=(systemd-analyze)
fi
if command -v promtool > /dev/null; then
    run promtool check rules prometheus/relay-alerts.yml
    (cd prometheus && run promtool test rules relay-alerts.test.yml) || status=1
else
    missing+=(promtool)
fi
if command -v shellcheck > /dev/null; then
    run shellcheck pg-backup.sh smoke-test.sh check.sh
else
    missing+=(shellcheck)
fi
env_file=$(mktemp)
sed 's/=replace-me$/=x/' env.example > "$env_file"
if docker compose version > /dev/null 2>&1; then
    run docker compose --env-file "$env_file" -f compose.yaml --profile smoke config --quiet
elif command -v docker-compose > /dev/null; then
    # Compose v1 knows every key used here but the top-level project name: check a copy without it.
    v1=$(mktemp)
    grep -v '^name: ' compose.yaml > "$v1"
    run docker-compose --project-directory . --env-file "$env_file" -f "$v1" --profile smoke config --quiet
    rm -f "$v1"
else
    missing+=("docker compose")
fi
rm -f "$env_file"
[ ${#missing[@]} -eq 0 ] || echo "not checked (not installed): ${missing[*]}"
exit $status
