# shellcheck shell=bash
# `ci/softroce setup`: host packages, the guest kernel (downloaded and unpacked, never installed)
# and the base initramfs. Idempotent; a second run only checks stamps. Sourced by ci/softroce.

# Installs the missing host packages; apt is not touched when all are installed.
ensure_packages() {
    local missing=() pkg status
    for pkg in "${HOST_PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
        [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    log "[$(elapsed)] installing Debian packages: ${missing[*]}"
    apt_update_once
    apt_logged apt-get install -y --no-install-recommends "${missing[@]}"
}

# Whether apt can fetch version $2 of package $1 (apt-cache show exits 0 even when it cannot).
apt_has_version() {
    apt-cache madison "$1" 2>/dev/null | awk -F'|' '{ gsub(/ /, "", $2); print $2 }' | grep -qxF -- "$2"
}

# Downloads the guest kernel package into the cache (no install: nothing touches the host's /boot,
# boot loader or /lib/modules) and records it in kernel.env.
ensure_kernel() {
    local pin="$KERNEL_PKG=$KERNEL_VERSION" pkg=$KERNEL_PKG ver=$KERNEL_VERSION deb kv
    if [[ -f "$CACHE/kernel.env" ]]; then
        # shellcheck source=/dev/null
        source "$CACHE/kernel.env"
        if [[ "${KSTATE_PIN:-}" == "$pin" && -f "$CACHE/kernel/${KSTATE_DEB:-none}" ]]; then
            return 0
        fi
    fi
    log "[$(elapsed)] fetching the guest kernel $pin"
    apt_has_version "$pkg" "$ver" || apt_update_once
    if ! apt_has_version "$pkg" "$ver"; then
        pkg=$(apt-cache depends "$KERNEL_META" 2>/dev/null |
            sed -n 's/^ *Depends: \(linux-image-[^ ]*\).*/\1/p' | head -n 1)
        ver=$(apt-cache policy "$pkg" 2>/dev/null | sed -n 's/^ *Candidate: //p')
        if [[ -z "$pkg" || -z "$ver" || "$ver" == "(none)" ]]; then
            die "the pinned guest kernel $pin is not in the apt archive, and no current" \
                "$KERNEL_META could be resolved either (is apt set up for Debian 12?)"
        fi
        warn "the pinned guest kernel $pin is no longer in the apt archive."
        warn "Using the current one instead: $pkg=$ver."
        warn "Pin it in ci/softroce.d/config.sh (KERNEL_PKG, KERNEL_VERSION) to silence this."
    fi
    rm -rf "$CACHE/kernel"
    mkdir -p "$CACHE/kernel"
    (cd "$CACHE/kernel" && apt_logged apt-get download -o APT::Sandbox::User=root "$pkg=$ver")
    deb=$(cd "$CACHE/kernel" && ls -- "${pkg}"_*.deb)
    kv=${pkg#linux-image-} # build_base checks that boot/vmlinuz-$kv is there
    {
        printf 'KSTATE_PIN=%q\n' "$pin"
        printf 'KSTATE_PKG=%q\nKSTATE_VERSION=%q\n' "$pkg" "$ver"
        printf 'KSTATE_DEB=%q\nKSTATE_KV=%q\n' "$deb" "$kv"
    } >"$CACHE/kernel.env"
    # shellcheck source=/dev/null
    source "$CACHE/kernel.env"
    log "[$(elapsed)] guest kernel $KSTATE_PKG $KSTATE_VERSION (KV $KSTATE_KV)"
}

# Everything the base image is made of: these scripts, the kernel and the host packages' versions.
base_key() {
    {
        cat "$SOFTROCE_D/config.sh" "$SOFTROCE_D/lib.sh" "$SOFTROCE_D/setup.sh" \
            "$SOFTROCE_D/guest-init" "$CACHE/kernel.env"
        dpkg-query -W -f='${Package} ${Version}\n' "${HOST_PACKAGES[@]}" 2>/dev/null
    } | sha256sum | cut -d' ' -f1
}

base_is_current() {
    [[ -f "$CACHE/base.stamp" && -f "$CACHE/base.cpio" && -f "$CACHE/base.files" &&
        -f "$CACHE/guest-kernel" && "$(cat "$CACHE/base.stamp")" == "$(base_key)" ]]
}

# The uncompressed kernel (an ELF with a PVH entry point, which qemu boots directly) out of the
# xz-compressed bzImage: decompressing the bzImage under TCG takes the guest about 3.5 s per boot.
# Prints nothing when that fails (then the bzImage is booted).
extract_vmlinux() {
    local bzimage=$1 out=$2 offset
    offset=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$bzimage" | head -n 1 | cut -d: -f1)
    [[ -n "$offset" ]] || return 0
    tail -c +$((offset + 1)) "$bzimage" | xz -dc --single-stream >"$out" 2>/dev/null || true
    if [[ "$(head -c 4 "$out" | od -An -c | tr -d ' ')" == '177ELF' ]]; then
        printf '%s\n' "$out"
    fi
}

# Copies the guest modules (each after its dependencies) and writes their load order.
put_modules() {
    local kroot=$1 root=$2 kv=$3 entry name params deps line path rel modname
    local -A seen=()
    local moddir="$kroot/lib/modules/$kv"
    depmod -b "$kroot" "$kv"
    : >"$root/etc/softroce/modules"
    for entry in "${GUEST_MODULES[@]}"; do
        read -r name params <<<"$entry"
        deps=$(modprobe -d "$kroot" -S "$kv" -C /dev/null --show-depends "$name") ||
            die "kernel module $name not found in $KSTATE_PKG"
        while IFS= read -r line; do
            case "$line" in
            builtin\ *) continue ;;
            insmod\ *) path=${line#insmod } && path=${path%% *} ;;
            *) die "modprobe --show-depends $name: unexpected line: $line" ;;
            esac
            rel=${path#"$moddir"/}
            [[ -n "${seen[$rel]:-}" ]] && continue
            seen[$rel]=1
            mkdir -p "$root/usr/lib/modules/$kv/$(dirname "$rel")"
            cp "$path" "$root/usr/lib/modules/$kv/$rel"
            # "sysfs-name path [parameters]"; the parameters belong to the named module only.
            modname=$(basename "$rel" .ko)
            modname=${modname//-/_}
            if [[ "$modname" == "${name//-/_}" ]]; then
                printf '%s %s %s\n' "$modname" "$rel" "$params" >>"$root/etc/softroce/modules"
            else
                printf '%s %s\n' "$modname" "$rel" >>"$root/etc/softroce/modules"
            fi
        done <<<"$deps"
    done
    cp "$moddir"/modules.{order,builtin,builtin.modinfo} "$root/usr/lib/modules/$kv/"
    depmod -b "$root" "$kv" # for the guest's modprobe (the kernel calls /sbin/modprobe)
}

build_base() {
    local work root kv=$KSTATE_KV pkg prog applet name dir
    log "[$(elapsed)] building the base initramfs"
    rm -rf "$CACHE"/build.* # left by a build that was killed (we hold the lock)
    work=$(mktemp -d "$CACHE/build.XXXXXX")
    # shellcheck disable=SC2064 # expand now: $work is local
    trap "rm -rf '$work'" EXIT
    root=$work/root

    dpkg -x "$CACHE/kernel/$KSTATE_DEB" "$work/kernel"

    # A merged /usr like the host's, so host library paths resolve the same way in the guest.
    mkdir -p "$root"/usr/{bin,sbin,lib64,lib/x86_64-linux-gnu} "$root"/{dev,proc,sys,run,root,ci}
    mkdir -p "$root/etc/softroce" "$root/tmp"
    for dir in bin sbin lib lib64; do ln -s "usr/$dir" "$root/$dir"; done

    put_modules "$work/kernel" "$root" "$kv"
    [[ -f "$work/kernel/boot/vmlinuz-$kv" ]] || die "$KSTATE_DEB holds no boot/vmlinuz-$kv"
    if [[ -z "$(extract_vmlinux "$work/kernel/boot/vmlinuz-$kv" "$work/guest-kernel")" ]]; then
        warn "could not unpack the uncompressed kernel from vmlinuz-$kv: booting the bzImage" \
            "(about 3.5 s slower per boot)"
        cp "$work/kernel/boot/vmlinuz-$kv" "$work/guest-kernel"
    fi

    # Tools with their libraries, then the rxe provider libibverbs dlopen()s.
    for pkg in "${GUEST_TOOL_PACKAGES[@]}"; do
        while IFS= read -r prog; do
            if [[ -f "$prog" && -x "$prog" ]]; then put_with_libs "$root" "$prog"; fi
        done < <(dpkg -L "$pkg" | grep -E '^(/usr)?/s?bin/[^/]+$')
    done
    for prog in "${GUEST_TOOLS[@]}" "${GUEST_PROVIDER_LIBS[@]}"; do
        put_with_libs "$root" "$prog"
    done
    for prog in "${GUEST_PROVIDER_FILES[@]}"; do
        put_file "$root" "$prog"
    done
    # iproute2's ip under both names, so busybox's ip applet never shadows it in $PATH.
    ln -sf ../bin/ip "$root/usr/sbin/ip"

    # busybox last: its applets only where no real tool of that name exists (copying a tool over
    # a busybox link would overwrite busybox itself).
    cp /bin/busybox "$root/usr/bin/busybox"
    while IFS= read -r applet; do
        [[ "$applet" == */* ]] || continue
        name=${applet##*/}
        [[ -e "$root/usr/bin/$name" || -e "$root/usr/sbin/$name" ]] && continue
        case "$applet" in
        sbin/* | usr/sbin/*) ln -s ../bin/busybox "$root/usr/sbin/$name" ;;
        *) ln -s busybox "$root/usr/bin/$name" ;;
        esac
    done < <(/bin/busybox --list-full)

    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
    printf 'root:x:0:\n' >"$root/etc/group"
    printf '127.0.0.1\tlocalhost\n%s\tsoftroce\n' "$GUEST_IP" >"$root/etc/hosts"
    {
        printf 'KV=%s\nNETDEV=%s\nIP=%s\n' "$kv" "$GUEST_NETDEV" "$GUEST_IP"
        printf 'PREFIX=%s\nMTU=%s\nRDMA_DEVICE=%s\n' "$GUEST_PREFIX" "$GUEST_MTU" "$GUEST_RDMA_DEVICE"
    } >"$root/etc/softroce/guest.env"
    install -m 0755 "$SOFTROCE_D/guest-init" "$root/init"

    make_cpio "$root" "$work/base.cpio"
    (cd "$root" && find . -mindepth 1 ! -type d -printf '/%P\n' | LC_ALL=C sort) >"$work/base.files"
    mv -f "$work/guest-kernel" "$CACHE/guest-kernel"
    mv -f "$work/base.files" "$CACHE/base.files"
    mv -f "$work/base.cpio" "$CACHE/base.cpio"
    base_key >"$CACHE/base.stamp"
    rm -rf "$work"
    trap - EXIT
    log "[$(elapsed)] base initramfs: $(du -h "$CACHE/base.cpio" | cut -f1)," \
        "$(wc -l <"$CACHE/base.files") files, kernel $kv"
}

# The whole of `setup`, under a lock so that parallel runs build the cache once.
do_setup() {
    mkdir -p "$CACHE"
    (
        flock 9
        ensure_packages
        ensure_kernel
        # shellcheck source=/dev/null
        source "$CACHE/kernel.env"
        if [[ "$KSTATE_PKG=$KSTATE_VERSION" != "$KERNEL_PKG=$KERNEL_VERSION" ]]; then
            warn "guest kernel $KSTATE_PKG=$KSTATE_VERSION, not the pinned" \
                "$KERNEL_PKG=$KERNEL_VERSION (gone from the archive): update ci/softroce.d/config.sh"
        fi
        if base_is_current; then
            [[ "${1:-}" == quiet ]] || log "[$(elapsed)] up to date ($CACHE)"
        else
            build_base
        fi
    ) 9>"$CACHE/.lock"
}
