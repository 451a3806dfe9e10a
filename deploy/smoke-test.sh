#!/usr/bin/env bash
# Smoke test of a compose deployment: one message into the relay, out to the sink, and the relay's
# health. Run from the repository root after
#     docker compose -f deploy/compose.yaml up -d --build
#     docker compose -f deploy/compose.yaml --profile smoke up -d sink
set -euo pipefail
compose=(docker compose -f "$(dirname "$0")/compose.yaml")
token="smoke-$(date +%s)-$RANDOM"

echo "== health"
"${compose[@]}" exec -T relay python -c "
import json, urllib.request
for path in ('/healthz', '/readyz'):
    with urllib.request.urlopen('http://127.0.0.1:8025' + path, timeout=5) as response:
        print(path, response.status, response.read().decode()[:200])
"

echo "== one message through the relay (submitted inside the relay container, a trusted loopback client)"
"${compose[@]}" exec -T relay python -c "
import smtplib
message = 'From: smoke@example.com\r\nTo: $token@smoke.test\r\nSubject: smoke test\r\n\r\nsmoke test\r\n'
with smtplib.SMTP('127.0.0.1', 2525, timeout=30) as client:
    print(client.sendmail('smoke@example.com', ['$token@smoke.test'], message) or 'accepted')
"

echo "== waiting for the sink to receive it (its log prints one line per message, with the recipient)"
for _ in $(seq 1 60); do
    if "${compose[@]}" --profile smoke logs sink 2>/dev/null | grep -q "$token"; then
        echo "delivered: the sink received the message ($token)"
        exit 0
    fi
    sleep 1
done
echo "the sink did not receive the message within 60 s; see: ${compose[*]} logs relay" >&2
exit 1
