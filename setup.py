"""piper_ds: resource-modelled, pipelined expert-parallel MoE training on DeepSpeed.

`pip install .` installs the pure-Python package; kernels JIT-build on first use through DeepSpeed's
op_builder. `PIPER_BUILD_OPS=1 pip install .` builds them ahead of time (needs CUDA and nvcc).
"""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _ext_modules():
    """Ahead-of-time builds of the csrc/ ops when PIPER_BUILD_OPS=1 (else they build on first use)."""
    if os.environ.get("PIPER_BUILD_OPS", "0") != "1":
        return [], {}
    import sys
    sys.path.insert(0, HERE)
    from op_builder import ALL_OPS  # our builders, absolute csrc paths
    from torch.utils.cpp_extension import BuildExtension
    builders = [cls() for cls in ALL_OPS.values()]  # CUDA flavours need a GPU and nvcc; CPU ones a C++ compiler
    exts = [b.builder() for b in builders if b.is_compatible(verbose=True)]
    for ext in exts:  # the builders give absolute paths (what a JIT build needs); setuptools wants relative ones
        ext.sources = [os.path.relpath(src, HERE) for src in ext.sources]
    return exts, {"build_ext": BuildExtension}


ext_modules, cmdclass = _ext_modules()

setup(
    name="piper_ds",
    version="0.1.0",
    description="Resource-modelled, pipelined expert-parallel Mixture-of-Experts training on DeepSpeed",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["piper_ds", "piper_ds.*"]) + ["piper_ds.op_builder"],
    package_dir={"piper_ds.op_builder": "op_builder"},
    # the kernel sources travel with the package so a JIT build works from an installed copy
    data_files=[(os.path.join("share", "piper_ds", os.path.relpath(d, HERE)),
                 [os.path.relpath(os.path.join(d, f), HERE) for f in sorted(fs)])
                for d, _, fs in sorted(os.walk(os.path.join(HERE, "csrc"))) if fs],
    package_data={"piper_ds": ["csrc/**/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.8",
        "deepspeed==0.19.*",
        "ninja",
        "pydantic>=2",
        "wandb",
        "tqdm",
        "rich",
        "matplotlib",
    ],
    # hf: piper_ds.integrations.hf (Hugging Face models); the version DeepSpeed 0.19.8's AutoEP works with
    extras_require={"dev": ["pytest>=8", "pytest-timeout", "hypothesis", "import-linter>=2.17"],
                    "hf": ["transformers==5.17.0"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["piper-plan=piper_ds.plan:main"]},
)
