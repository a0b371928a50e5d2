//! Give every binary, test and bench an RPATH to libtorch, so nothing needs LD_LIBRARY_PATH,
//! record the source revision (checked across data-parallel ranks at start-up), and compile the
//! FLOP counter over libtorch's operator record (src/model/flop_trace.cpp).
fn main() {
    println!("cargo::rustc-check-cfg=cfg(flop_trace)");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        println!("cargo:rustc-env=XRAYGLM_LIBTORCH_LIB={dir}");
        flop_trace(std::path::Path::new(&dir));
    }
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let rev = match git(&["rev-parse", "HEAD"]) {
        Some(r) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            format!("{r}{}", if dirty { "+dirty" } else { "" })
        }
        None => "unknown".to_string(),
    };
    println!("cargo:rustc-env=XRAYGLM_GIT_REV={rev}");
    for f in [".git/HEAD", ".git/index"] {
        if std::path::Path::new(f).exists() {
            println!("cargo:rerun-if-changed={f}");
        }
    }
}

/// Compile src/model/flop_trace.cpp against libtorch's headers (beside its `lib`), with the C++
/// ABI torch-sys uses (`LIBTORCH_CXX11_ABI`, default 1); `cfg(flop_trace)` tells the crate.
fn flop_trace(lib: &std::path::Path) {
    let Some(root) = lib.parent() else { return };
    let include = root.join("include");
    if !include.join("ATen/record_function.h").is_file() {
        return;
    }
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    println!("cargo:rerun-if-changed=src/model/flop_trace.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    cc::Build::new()
        .cpp(true)
        .file("src/model/flop_trace.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        // libtorch's classes are laid out as its release build has them.
        .define("NDEBUG", None)
        .flag("-w")
        .compile("xrayglm_flop_trace");
    println!("cargo:rustc-cfg=flop_trace");
}
