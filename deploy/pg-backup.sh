#!/usr/bin/env bash
# Backups of the relay's Postgres queue database: pg_dump custom format, rotation by count and age, and
# restore into a database you name. Needs pg_dump / pg_restore / psql of the server's major version or newer.
#
#   pg-backup.sh backup  [--dir DIR] [--keep N] [--max-age DAYS] [DATABASE_URL]
#   pg-backup.sh restore FILE TARGET_URL [--create] [--clean]
#   pg-backup.sh list    [--dir DIR]
#
# backup   Dumps DATABASE_URL (default: $RELAY_STORE__URL, else $DATABASE_URL) to
#          DIR/relay-<database>-<UTC time>.dump (default DIR: $RELAY_BACKUP_DIR, else ./backups), mode
#          0600 — the queue holds message bodies. The dump is written under a temporary name, checked with
#          pg_restore --list, and only then renamed into place, so a failed run never leaves a file that
#          looks like a backup. Then rotation: backups of that database beyond the newest N (default 14)
#          and those older than DAYS (default 30) are deleted; the newest one is never deleted.
#          --keep 0 / --max-age 0 turn a rule off.
# restore  Restores FILE into the database named by TARGET_URL (postgresql://user@host:5432/name).
#          --create creates that database first (connecting to the same server's "postgres" database);
#          without it the database must exist. A database that already holds the relay's tables is refused
#          unless --clean is given (which drops the objects in the dump first). Runs in one transaction: a
#          restore either completes or leaves the target as it was. Prints the row counts it restored.
# list     The backups in DIR, newest first, with size and time.
#
# Exit status: 0 ok, 1 failure, 2 usage. Passwords belong in the URL's environment variable or in
# ~/.pgpass (PGPASSFILE), never on a command line others can read in the process list.
set -euo pipefail
umask 077

PREFIX="relay"

log() { printf '%s pg-backup: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

# The database name in a postgresql:// URL (its path), without query parameters.
db_name() {
    local rest=${1#*://}
    rest=${rest#*/}
    [ "$rest" != "${1#*://}" ] || { echo ""; return; }
    rest=${rest%%\?*}
    printf '%s' "$rest"
}

# The URL with its database replaced by $2 (query parameters, such as sslmode, kept).
with_db() {
    local url=$1 name=$2 scheme rest authority query=""
    scheme=${url%%://*}
    rest=${url#*://}
    case $rest in *\?*) query="?${rest#*\?}"; rest=${rest%%\?*};; esac
    authority=${rest%%/*}
    printf '%s://%s/%s%s' "$scheme" "$authority" "$name" "$query"
}

safe_name() { printf '%s' "$1" | tr -c 'A-Za-z0-9_.-' '_'; }

# -- backup -------------------------------------------------------------------------------------------
cmd_backup() {
    local dir=${RELAY_BACKUP_DIR:-./backups} keep=14 max_age=30 url=${RELAY_STORE__URL:-${DATABASE_URL:-}}
    while [ $# -gt 0 ]; do
        case $1 in
            --dir) dir=$2; shift 2;;
            --keep) keep=$2; shift 2;;
            --max-age) max_age=$2; shift 2;;
            -h|--help) usage;;
            -*) log "unknown option $1"; usage;;
            *) url=$1; shift;;
        esac
    done
    [ -n "$url" ] || die "no database: give DATABASE_URL or set RELAY_STORE__URL"
    case $url in postgres://*|postgresql://*) ;; *) die "not a postgresql:// URL (SQLite queues: copy the file while the relay is stopped)";; esac
    [[ $keep =~ ^[0-9]+$ && $max_age =~ ^[0-9]+$ ]] || die "--keep and --max-age take whole numbers"
    local name stamp file partial
    name=$(safe_name "$(db_name "$url")")
    [ -n "$name" ] || die "the URL names no database"
    mkdir -p "$dir"
    stamp=$(date -u +%Y%m%dT%H%M%SZ)
    file="$dir/$PREFIX-$name-$stamp.dump"
    while [ -e "$file" ]; do    # a backup within the same second: names must stay unique and time-ordered
        sleep 1
        stamp=$(date -u +%Y%m%dT%H%M%SZ)
        file="$dir/$PREFIX-$name-$stamp.dump"
    done
    partial="$dir/.$PREFIX-$name-$stamp.dump.partial"
    trap 'rm -f "$partial"' EXIT
    log "dumping $name to $file"
    # Custom format: compressed, restorable table by table; one snapshot of the whole database.
    pg_dump --format=custom --compress=6 --no-owner --no-privileges --file="$partial" --dbname="$url"
    pg_restore --list "$partial" > /dev/null || die "the dump does not read back; nothing kept"
    chmod 0600 "$partial"
    mv "$partial" "$file"
    trap - EXIT
    log "backup complete: $file ($(stat -c %s "$file") bytes)"
    rotate "$dir" "$name" "$keep" "$max_age"
}

# Delete backups of database $2 in $1 beyond the newest $3 or older than $4 days; never the newest.
rotate() {
    local dir=$1 name=$2 keep=$3 max_age=$4 now rank=0 file age_days
    now=$(date +%s)
    # Names sort by time (UTC stamps of fixed width): newest first.
    while IFS= read -r file; do
        rank=$((rank + 1))
        [ "$rank" -gt 1 ] || continue
        age_days=$(( (now - $(stat -c %Y "$file")) / 86400 ))
        if { [ "$keep" -gt 0 ] && [ "$rank" -gt "$keep" ]; } || { [ "$max_age" -gt 0 ] && [ "$age_days" -ge "$max_age" ]; }; then
            log "rotation: deleting $file (number $rank, $age_days days old)"
            rm -f -- "$file"
        fi
    done < <(find "$dir" -maxdepth 1 -type f -name "$PREFIX-$name-*.dump" -printf '%f\n' | sort -r | sed "s#^#$dir/#")
}

# -- restore ------------------------------------------------------------------------------------------
cmd_restore() {
    local file="" target="" create=0 clean=0
    while [ $# -gt 0 ]; do
        case $1 in
            --create) create=1; shift;;
            --clean) clean=1; shift;;
            -h|--help) usage;;
            -*) log "unknown option $1"; usage;;
            *) if [ -z "$file" ]; then file=$1; elif [ -z "$target" ]; then target=$1; else usage; fi; shift;;
        esac
    done
    if [ -z "$file" ] || [ -z "$target" ]; then usage; fi
    [ -r "$file" ] || die "cannot read $file"
    pg_restore --list "$file" > /dev/null || die "$file is not a pg_dump custom-format archive"
    local name
    name=$(db_name "$target")
    [ -n "$name" ] || die "TARGET_URL names no database"
    if [ "$create" -eq 1 ]; then
        log "creating database $name"
        # Through stdin, where psql quotes the name itself (:"name"); --command would not interpolate it.
        printf 'CREATE DATABASE :"name";\n' \
            | psql --no-psqlrc --quiet --set=ON_ERROR_STOP=1 --set=name="$name" \
                   --dbname="$(with_db "$target" postgres)" --file=- \
            || die "cannot create database $name (does it exist already?)"
    fi
    local existing
    existing=$(psql --no-psqlrc --tuples-only --no-align --set=ON_ERROR_STOP=1 --dbname="$target" \
                    --command="SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public' AND table_name = 'messages'") \
        || die "cannot connect to $name"
    if [ "$existing" != "0" ] && [ "$clean" -eq 0 ]; then
        die "database $name already holds a relay queue; restore into a new database (--create) or add --clean"
    fi
    local options=(--no-owner --no-privileges --exit-on-error --single-transaction)
    [ "$clean" -eq 0 ] || options+=(--clean --if-exists)
    log "restoring $file into $name"
    pg_restore "${options[@]}" --dbname="$target" "$file"
    log "restore complete; rows per table:"
    local table
    for table in $(psql --no-psqlrc --tuples-only --no-align --set=ON_ERROR_STOP=1 --dbname="$target" \
                        --command="SELECT table_name FROM information_schema.tables
                                   WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY 1"); do
        [[ $table =~ ^[a-z_][a-z0-9_]*$ ]] || continue
        printf '%s %s\n' "$table" "$(psql --no-psqlrc --tuples-only --no-align --set=ON_ERROR_STOP=1 \
                                         --dbname="$target" --command="SELECT count(*) FROM public.$table")"
    done
}

# -- list ---------------------------------------------------------------------------------------------
cmd_list() {
    local dir=${RELAY_BACKUP_DIR:-./backups}
    while [ $# -gt 0 ]; do
        case $1 in --dir) dir=$2; shift 2;; *) usage;; esac
    done
    [ -d "$dir" ] || die "no directory $dir"
    find "$dir" -maxdepth 1 -type f -name "$PREFIX-*.dump" -printf '%f\t%s bytes\t%TY-%Tm-%Td %TH:%TM\n' | sort -r
}

[ $# -gt 0 ] || usage
command=$1; shift
case $command in
    backup) cmd_backup "$@";;
    restore) cmd_restore "$@";;
    list) cmd_list "$@";;
    -h|--help|help) usage;;
    *) log "unknown command $command"; usage;;
esac
