"""CPU kernels the decoding trunk calls through XLA's FFI (jax.ffi), built on first use.

One kernel so far, `qmatvec.cc`: one row of float32 activations times a block-quantized
[out, in] matrix (groups of 32 inputs), the dequantization done in registers (models/quant.py
`kernel_form`, `matvec`; README "Quantized weights" says why and what it measured).

The source is compiled with the machine's C++ compiler (`$CXX`, else g++) against the FFI
headers jaxlib ships (`jax.ffi.include_dir()`), once per source / jaxlib version, into
`$FASTDECODE_KERNEL_CACHE` (default ~/.cache/fastdecode); a compiler missing or failing
leaves `available()` False (with one warning) and the trunk on XLA's own dot. Set
FASTDECODE_CPU_KERNELS=0 to turn the kernels off.
"""
import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile

import jax

SOURCE = os.path.join(os.path.dirname(__file__), 'qmatvec.cc')
# FFI target names: (packed nibbles, with min) -> name
TARGETS = {(False, False): 'fastdecode_qmatvec_int8',
           (False, True): 'fastdecode_qmatvec_int8_min',
           (True, False): 'fastdecode_qmatvec_nibble',
           (True, True): 'fastdecode_qmatvec_nibble_min'}
_SYMBOLS = {(False, False): 'FastdecodeQMatVecInt8', (False, True): 'FastdecodeQMatVecInt8Min',
            (True, False): 'FastdecodeQMatVecNibble', (True, True): 'FastdecodeQMatVecNibbleMin'}


def _library_path() -> str:
  with open(SOURCE, 'rb') as f:
    source = f.read()
  key = hashlib.sha256(source + jax.__version__.encode() + platform.machine().encode()
                       + platform.node().encode()).hexdigest()[:16]
  root = os.environ.get('FASTDECODE_KERNEL_CACHE',
                        os.path.join(os.path.expanduser('~'), '.cache', 'fastdecode'))
  return os.path.join(root, f'qmatvec-{key}.so')


def _build(path: str) -> None:
  """Compiles SOURCE into `path` (written whole: a temporary file renamed into place)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  handle, tmp = tempfile.mkstemp(suffix='.so', dir=os.path.dirname(path))
  os.close(handle)
  try:
    subprocess.run([os.environ.get('CXX', 'g++'), '-O3', '-march=native', '-std=c++17',
                    '-shared', '-fPIC', '-isystem', jax.ffi.include_dir(), SOURCE, '-o', tmp],
                   check=True, capture_output=True, text=True, timeout=300)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _reason(error: Exception) -> str:
  """One line saying why the build or load failed: the compiler's last line of errors."""
  lines = (getattr(error, 'stderr', None) or '').strip().splitlines()
  if lines:
    return lines[-1]
  if isinstance(error, subprocess.CalledProcessError):
    return f'{error.cmd[0]} exited with status {error.returncode}'
  return str(error).splitlines()[0] if str(error) else type(error).__name__


@functools.cache
def available() -> bool:
  """Whether the CPU kernels are built, vectorized (AVX2 / FMA) and registered with XLA.
  False where they are turned off, the backend is not a CPU, or the build failed."""
  if os.environ.get('FASTDECODE_CPU_KERNELS', '1') == '0' or jax.default_backend() != 'cpu':
    return False
  path = _library_path()
  try:
    if not os.path.exists(path):
      _build(path)
    try:
      library = ctypes.cdll.LoadLibrary(path)
    except OSError:          # a cached library that does not load (truncated): rebuilt once
      os.remove(path)
      _build(path)
      library = ctypes.cdll.LoadLibrary(path)
  except (OSError, subprocess.SubprocessError) as error:
    logging.warning('fastdecode CPU kernels unavailable (XLA dot used instead): %s',
                    _reason(error))
    return False
  if not library.FastdecodeQMatVecVectorized():
    return False    # the scalar loop is slower than XLA's dot: not worth calling
  for key, name in TARGETS.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, _SYMBOLS[key])),
                                platform='cpu')
  return True
