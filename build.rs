//! Give every binary, test and bench an RPATH to libtorch, so nothing needs LD_LIBRARY_PATH.
fn main() {
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        println!("cargo:rustc-env=XRAYGLM_LIBTORCH_LIB={dir}");
    }
    println!("cargo:rerun-if-env-changed=LIBTORCH");
}
