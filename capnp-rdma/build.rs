//! Compiles the language-neutral schemas in `../schemas` into Rust modules.

fn main() {
    println!("cargo:rerun-if-changed=../schemas/frame.capnp");
    capnpc::CompilerCommand::new()
        .src_prefix("../schemas")
        .file("../schemas/frame.capnp")
        .run()
        .expect(
            "compiling schemas/frame.capnp: the `capnp` tool is required (Debian package \
             `capnproto`; `ci/deps` installs it)",
        );
}
