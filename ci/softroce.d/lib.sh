# shellcheck shell=bash
# Helpers shared by setup and run. Sourced by ci/softroce.

log() { printf 'softroce: %s\n' "$*" >&2; }
warn() { printf 'softroce: WARNING: %s\n' "$*" >&2; }
die() {
    printf 'softroce: ERROR: %s\n' "$*" >&2
    exit 1
}

# Seconds since this script started, for progress lines.
elapsed() { printf '%ds' "$((SECONDS - START_SECONDS))"; }

# Runs a command as root (directly, or through sudo).
as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root or sudo to run: $*"
    fi
}

# Runs an apt command with its output in $CACHE/apt.log, shown only when it fails.
apt_logged() {
    if ! as_root env DEBIAN_FRONTEND=noninteractive "$@" >>"$CACHE/apt.log" 2>&1; then
        tail -n 40 "$CACHE/apt.log" >&2
        die "failed: $* (whole output: $CACHE/apt.log)"
    fi
}

APT_UPDATED=0
apt_update_once() {
    if [[ "$APT_UPDATED" -eq 0 ]]; then
        log "[$(elapsed)] apt-get update"
        apt_logged apt-get update
        APT_UPDATED=1
    fi
}

# Quotes one word for a POSIX shell (the guest's busybox sh): 'it'\''s'.
sh_quote() {
    local q="'\\''"
    printf "'%s'" "${1//\'/$q}"
}

# Prints the libraries a dynamically linked ELF file needs (its whole ldd closure, the dynamic
# loader included), one absolute path per line. Nothing for static binaries and scripts.
# Fails when a library is not found.
ldd_closure() {
    local file=$1 out line name arrow path missing=()
    if ! out=$(LC_ALL=C ldd "$file" 2>&1); then
        # "not a dynamic executable" (static binary, script) is fine: no libraries.
        return 0
    fi
    while IFS= read -r line; do
        # bash's read splits on spaces and tabs alike (mawk's \s would not match: see pitfalls).
        read -r name arrow path _ <<<"$line"
        if [[ "$arrow" == "=>" ]]; then
            if [[ "$path" == "not" ]]; then
                missing+=("$name")
            elif [[ "$path" == /* ]]; then
                printf '%s\n' "$path"
            fi
        elif [[ "$name" == /* ]]; then
            printf '%s\n' "$name" # the dynamic loader: "/lib64/ld-linux-x86-64.so.2 (0x...)"
        fi
    done <<<"$out"
    if [[ ${#missing[@]} -gt 0 ]]; then
        die "$file: libraries not found by ldd: ${missing[*]}"
    fi
}

# The guest's path for a host file: its directory resolved through symlinks (so /lib/x/libc.so.6
# lands in /usr/lib/x/libc.so.6 on the guest's merged /usr, never through the /lib symlink that a
# later cpio archive would replace with a directory), and its own name kept.
guest_path() {
    local dir
    dir=$(readlink -f "$(dirname "$1")")
    printf '%s/%s\n' "${dir%/}" "$(basename "$1")"
}

# Copies a host file (symlinks followed) into ROOT at its guest path, or at DEST if given.
put_file() {
    local root=$1 src=$2 dest=${3:-}
    [[ -n "$dest" ]] || dest=$(guest_path "$src")
    if [[ ! -e "$root$dest" ]]; then
        mkdir -p "$root$(dirname "$dest")"
        cp -L --preserve=mode "$src" "$root$dest"
    fi
}

# Copies a host program or library into ROOT (at DEST if given) with every library it needs.
put_with_libs() {
    local root=$1 src=$2 dest=${3:-} lib libs
    [[ -e "$src" ]] || die "no such file: $src"
    put_file "$root" "$src" "$dest"
    libs=$(ldd_closure "$src") || exit 1
    while IFS= read -r lib; do
        if [[ -n "$lib" ]]; then put_file "$root" "$lib"; fi
    done <<<"$libs"
}

# Writes a newc cpio archive of everything under DIR (owned by root) to OUT.
make_cpio() {
    local dir=$1 out=$2
    (cd "$dir" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
        cpio --quiet -o -H newc -R 0:0) >"$out"
}
