//! Compiles the store's control protocol (`../schemas/store.capnp`) into a Rust module.

fn main() {
    println!("cargo:rerun-if-changed=../schemas/store.capnp");
    capnpc::CompilerCommand::new()
        .src_prefix("../schemas")
        .file("../schemas/store.capnp")
        .run()
        .expect(
            "compiling schemas/store.capnp: the `capnp` tool is required (Debian package \
             `capnproto`; `ci/deps` installs it)",
        );
}
