"""Install: pip install -e .     (tests: pip install -e '.[test,hf]')

The `hf` extra (torch CPU + transformers) is the reference the Hugging Face import tests
compare against. It pins torch==2.13.0: on our CI machines that is a local CPU build; on
PyPI it is a CUDA build of several GB, so elsewhere install a CPU build first
(pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu).
"""
from setuptools import find_packages, setup

setup(
    name='fastdecode',
    version='0.1.0',
    description='JAX/Flax research codebase for fast language-model decoding.',
    python_requires='>=3.10',
    packages=find_packages(include=[f'{top}{sub}' for top in
                                    ('configs', 'models', 'decoding', 'training', 'launch')
                                    for sub in ('', '.*')]),
    # The CPU kernels' source, compiled on first use (models/cpu_kernels/__init__.py).
    package_data={'models.cpu_kernels': ['*.cc']},
    install_requires=[
        'jax>=0.4.35',
        'flax>=0.10',
        'optax>=0.2.4',
        'orbax-checkpoint>=0.11',
        'tensorflow-datasets>=4.9.7',   # used without TensorFlow: builders + array_record
        'importlib_resources',          # TFDS imports it for builders defined in packages
        'array_record>=0.5',
        'grain>=0.2.6',
        'einops>=0.8',
        'absl-py>=2.0',
        'ml_collections>=0.1.1',
        'sentencepiece>=0.2',
        'numpy',
        'tqdm',
        'tensorboardX>=2.6',            # TensorBoard event files without TensorFlow
        'matplotlib',
        'safetensors>=0.4',             # Hugging Face checkpoints (launch.convert)
        'tokenizers>=0.19',             # tokenizer.json of imported checkpoints
        'jinja2>=3.1.6',                # chat templates (training/chat.py), sandboxed
        'gguf>=0.10',                   # GGUF import/export (launch.convert --from_gguf/--to_gguf)
        'qwix>=0.1.8',                  # weight quantization (models/quant.py, --quantize)
    ],
    extras_require={
        'test': ['pytest>=7', 'pytest-xdist>=3', 'filelock', 'chex>=0.1.87', 'scipy'],
        'hf': ['torch==2.13.0', 'transformers>=4.46', 'accelerate'],  # accelerate: GGUF loads
    },
)
