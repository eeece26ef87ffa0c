# shellcheck shell=bash disable=SC2034 # the variables are used by the files that source this
# Pins and lists for ci/softroce. Sourced by ci/softroce; edit here, and the next `setup` rebuilds
# the base image by itself (this file is part of the base image's stamp).

# The guest kernel: Debian 12's own 6.1 kernel (it ships rdma_rxe as a module). Pinned exactly so
# that every machine boots the same kernel. The package is only downloaded and unpacked into the
# cache, never installed on the host. When Debian drops this version from the archive, `setup`
# falls back to the current one (what linux-image-amd64 depends on) and says so: update the pin then.
KERNEL_PKG=linux-image-6.1.0-56-amd64
KERNEL_VERSION=6.1.192-2
KERNEL_META=linux-image-amd64

# Debian packages the host needs (apt is skipped entirely when all are installed).
HOST_PACKAGES=(
    qemu-system-x86      # qemu-system-x86_64 (TCG: software emulation, no KVM needed)
    rdma-core
    ibverbs-utils        # ibv_devices, ibv_devinfo, ibv_*_pingpong
    ibverbs-providers    # librxe-rdmav34.so (the Soft-RoCE provider libibverbs dlopen()s)
    rdmacm-utils         # rping, ucmatose, udaddy (rdma_cm checks)
    perftest             # ib_write_bw and friends: the reference peer
    busybox-static       # the guest's shell and coreutils
    kmod                 # modprobe --show-depends / depmod against the unpacked kernel
    iproute2             # ip, rdma
    cpio
    gzip
    xz-utils             # to unpack the uncompressed kernel out of the bzImage
    util-linux           # flock
    coreutils            # timeout, sha256sum
)

# Kernel modules for the guest, loaded in this order (each after its dependencies, which setup
# resolves with modprobe --show-depends). Words after the name are module parameters.
#   crc32_generic  rdma_rxe asks the crypto API for "crc32"; without it `rdma link add` fails
#                  with ENOENT ("failed to init crc32 algorithm err:-2")
#   dummy          the netdev under rxe0; numdummies=0 so no stray dummy0 appears
GUEST_MODULES=(
    "crc32_generic"
    "configfs"
    "dummy numdummies=0"
    "rdma_rxe"
    "rdma_ucm"
)

# Programs carried into the guest with their libraries (packages: every executable they ship in
# a bin directory), and single programs by path.
GUEST_TOOL_PACKAGES=(ibverbs-utils perftest rdmacm-utils)
GUEST_TOOLS=(/usr/bin/ip /usr/bin/rdma)

# libibverbs dlopen()s its provider, which ldd cannot see: carry it at its exact path, with the
# driver file that names it (and only that one, so libibverbs tries no other provider).
GUEST_PROVIDER_LIBS=(/usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so)
GUEST_PROVIDER_FILES=(/etc/libibverbs.d/rxe.driver)

# The guest network and RDMA device (the init script reads these from /etc/softroce/guest.env).
GUEST_NETDEV=rxedev
GUEST_IP=10.11.0.1
GUEST_PREFIX=24
GUEST_MTU=9000
GUEST_RDMA_DEVICE=rxe0

# Defaults of `run`.
DEFAULT_TIMEOUT=600
DEFAULT_MEM=2G
DEFAULT_SMP=2

# Statuses `run` returns when the guest could not report the command's own status.
STATUS_TIMEOUT=124       # the guest did not finish within --timeout
STATUS_GUEST_FAILED=125  # kernel panic, guest setup failure, qemu failure: no status reported
