// Shared body of the build scripts of every crate whose binaries or tests link libtorch
// (included with `include!`). It links libtorch_cuda explicitly (with --no-as-needed, or the
// linker drops it and CUDA is silently unavailable) and sets an rpath to the venv's torch/lib so
// binaries run without LD_LIBRARY_PATH.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../deploy/torch_link.rs");
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
    println!("cargo:rerun-if-env-changed=LIBTORCH_LIB_DIR");
    let lib_dir = match std::env::var("LIBTORCH_LIB_DIR") {
        Ok(dir) => dir,
        Err(_) => {
            let python = if std::env::var_os("VIRTUAL_ENV").is_some() { "python" } else { "python3" };
            let output = std::process::Command::new(python)
                .args(["-c", "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))"])
                .output();
            match output {
                Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
                _ => {
                    eprintln!("could not locate torch with `{python}`: run deploy/setup.sh once, then `source deploy/env.sh`");
                    std::process::exit(1);
                }
            }
        }
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    println!("cargo:rustc-link-arg=-L{lib_dir}");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    if std::path::Path::new(&lib_dir).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-ltorch_cuda");
    }
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
}
