#!/usr/bin/env bash
# bench/setup.sh — install what the benchmarks need on a fresh Debian machine (run as root).
#
# - postfix: smtp-source (load generator), smtp-sink (reference sink), and Postfix itself as a
#   reference MTA. Preseeded to "No configuration" so the package does NOT configure or start a
#   system instance on port 25: the benchmarks only ever run private instances in temp directories.
# - swaks: handy for poking a server by hand.
# - Haraka (optional): `npm install Haraka` into bench/.haraka; a failure is reported, never fatal.
#
# Idempotent: every step checks before it acts. Set BENCH_SKIP_HARAKA=1 to skip the npm step.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export DEBIAN_FRONTEND=noninteractive

need_apt=()
command -v smtp-source >/dev/null 2>&1 && command -v smtp-sink >/dev/null 2>&1 \
    && command -v postfix >/dev/null 2>&1 || need_apt+=(postfix)
command -v swaks >/dev/null 2>&1 || need_apt+=(swaks)

if ((${#need_apt[@]})); then
    # "No configuration": no /etc/postfix/main.cf written, no system instance started.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

# smtp-source/smtp-sink live in /usr/sbin; make sure a system instance is not running because of us.
# (We never stop one we did not start: only report it.)
if [[ -e /etc/postfix/main.cf ]]; then
    echo "note: /etc/postfix/main.cf exists (a system Postfix is configured); the benchmarks never use it"
fi

for tool in smtp-source smtp-sink postfix postsuper postqueue swaks; do
    command -v "$tool" >/dev/null 2>&1 || { echo "setup: $tool missing after install" >&2; exit 1; }
done

if [[ "${BENCH_SKIP_HARAKA:-0}" != 1 ]]; then
    if [[ -x "$here/.haraka/node_modules/.bin/haraka" ]]; then
        :
    elif command -v npm >/dev/null 2>&1; then
        mkdir -p "$here/.haraka"
        if ! timeout 300 npm install --prefix "$here/.haraka" --no-audit --no-fund --loglevel=error \
                Haraka >"$here/.haraka/npm-install.log" 2>&1; then
            echo "note: npm install Haraka failed (see bench/.haraka/npm-install.log); Haraka is skipped"
        fi
    else
        echo "note: npm not found; Haraka is skipped"
    fi
fi

echo "bench setup ok: $(command -v smtp-source) $(command -v smtp-sink) $(postconf -d -h mail_version 2>/dev/null || echo '?')"
