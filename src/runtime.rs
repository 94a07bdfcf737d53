//! Loading ONNX Runtime (`ort` with `load-dynamic`) and opening sessions.
//!
//! The shared library is found at `ORT_DYLIB_PATH` if set, else where `scripts/setup.sh` puts it
//! (`$PREFSTREAM_CACHE/ort/libonnxruntime.so`). We always go through `ort::init_from`, because
//! ort's implicit `ORT_DYLIB_PATH` route panics on a bad path instead of returning an error.

use std::{
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{Mutex, OnceLock},
};

use ort::{environment::Environment, ep, session::Session};

const FIX: &str = "run scripts/setup.sh or set ORT_DYLIB_PATH to a libonnxruntime.so";

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("ONNX Runtime library not found (tried {tried}); {FIX}")]
    LibraryMissing { tried: String },
    #[error("could not load ONNX Runtime from {path}: {message}; {FIX}")]
    LibraryLoad { path: PathBuf, message: String },
    #[error("ONNX Runtime environment: {0}")]
    Environment(String),
    #[error("model file {0} does not exist")]
    ModelMissing(PathBuf),
    #[error("could not register the CUDA execution provider (device {device}): {message}")]
    Cuda { device: u32, message: String },
    #[error("could not open model {path}: {message}")]
    Session { path: PathBuf, message: String },
    #[error("invalid device {0:?}: expected \"cpu\", \"cuda\" or \"cuda:N\"")]
    BadDevice(String),
}

/// Where inference runs. CUDA never falls back to CPU silently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(u32),
}

impl FromStr for Device {
    type Err = RuntimeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => t
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| RuntimeError::BadDevice(s.to_string())),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// `$PREFSTREAM_CACHE`, defaulting to `$HOME/.cache/prefstream`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("PREFSTREAM_CACHE") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => {
            let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
            home.join(".cache").join("prefstream")
        }
    }
}

/// The ONNX Runtime shared library to load; an error names every path tried and the fix.
pub fn ort_library_path() -> Result<PathBuf, RuntimeError> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(RuntimeError::LibraryMissing { tried: format!("ORT_DYLIB_PATH={}", p.display()) })
        };
    }
    let p = cache_dir().join("ort").join("libonnxruntime.so");
    if p.is_file() {
        Ok(p)
    } else {
        Err(RuntimeError::LibraryMissing { tried: p.display().to_string() })
    }
}

static ENV: OnceLock<Environment> = OnceLock::new();
static ENV_INIT: Mutex<()> = Mutex::new(());

/// The process-wide ONNX Runtime environment, created on first use. A failure is not cached,
/// so a later call can succeed once the library is installed.
pub fn environment() -> Result<&'static Environment, RuntimeError> {
    if let Some(env) = ENV.get() {
        return Ok(env);
    }
    let _guard = ENV_INIT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(env) = ENV.get() {
        return Ok(env);
    }
    let path = ort_library_path()?;
    let builder =
        ort::init_from(&path).map_err(|e| RuntimeError::LibraryLoad { path: path.clone(), message: e.to_string() })?;
    let env = builder.with_name("prefstream").build().map_err(|e| RuntimeError::Environment(e.to_string()))?;
    Ok(ENV.get_or_init(|| env))
}

/// Opens `path` on `device`. CUDA registration errors out on a CPU-only library.
pub fn session_from_file(path: &Path, device: &Device) -> Result<Session, RuntimeError> {
    if !path.is_file() {
        return Err(RuntimeError::ModelMissing(path.to_path_buf()));
    }
    let env = environment()?;
    let session_err = |message: String| RuntimeError::Session { path: path.to_path_buf(), message };
    let mut builder = Session::builder(env).map_err(|e| session_err(e.to_string()))?;
    // ORT's default pool busy-waits, which halves throughput when the cores are shared (a
    // service also runs Kafka and Redis clients); spinning stays off unless asked for.
    let threads = std::env::var("PREFSTREAM_ORT_THREADS").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
    let spin = std::env::var("PREFSTREAM_ORT_SPIN").is_ok_and(|v| v == "1");
    builder = builder.with_intra_threads(threads).map_err(|e| session_err(e.to_string()))?;
    builder = builder.with_intra_op_spinning(spin).map_err(|e| session_err(e.to_string()))?;
    if let Device::Cuda(n) = *device {
        let id = i32::try_from(n).map_err(|_| RuntimeError::BadDevice(device.to_string()))?;
        let cuda = ep::CUDA::default().with_device_id(id).build().error_on_failure();
        builder = builder
            .with_execution_providers([cuda])
            .map_err(|e| RuntimeError::Cuda { device: n, message: e.to_string() })?;
    }
    builder.commit_from_file(path).map_err(|e| session_err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("CUDA".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        assert!("cuda:x".parse::<Device>().is_err());
        assert!("gpu".parse::<Device>().is_err());
        assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn missing_model_names_the_file() {
        let err = match session_from_file(Path::new("/nonexistent/model.onnx"), &Device::Cpu) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("opened a missing model"),
        };
        assert!(err.contains("/nonexistent/model.onnx"), "{err}");
    }
}
