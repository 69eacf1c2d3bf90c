# Source this to build or run fsmerge by hand: activates the project venv that holds
# torch==2.11.0 (libtorch for tch) and tells tch to use it.
_fsmerge_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export VIRTUAL_ENV="$_fsmerge_root/.venv"
export PATH="$VIRTUAL_ENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
unset _fsmerge_root
