//! Compiles `im.proto` with protox (pure Rust), so a fresh machine needs no
//! system `protoc`; the .proto file stays the single source of truth.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=im.proto");
    let fds = protox::compile(["im.proto"], ["."])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
