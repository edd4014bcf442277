#!/bin/sh
# Redis with the farm's settings; the password (REDIS_PASSWORD_FILE, default the Docker secret
# /run/secrets/redis_password) goes into a config file, never onto the command line.
set -eu
secret=${REDIS_PASSWORD_FILE:-/run/secrets/redis_password}
[ -s "$secret" ] || { echo "redis: no password in $secret" >&2; exit 1; }
conf=$(mktemp /tmp/redis.XXXXXX.conf)
chmod 600 "$conf"
{
    echo "bind * -::*"
    echo "protected-mode no"
    echo "port 6379"
    echo "dir /data"
    echo "appendonly yes"
    echo "appendfsync everysec"
    echo "maxmemory-policy noeviction"
    echo "save \"\""
    printf 'requirepass "%s"\n' "$(sed 's/["\\]/\\&/g' "$secret" | head -1)"
} > "$conf"
exec redis-server "$conf" "$@"
