from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [
    line.strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="densevlm",
    version="0.1.0",
    description="Region-language alignment of vision-language models for open-vocabulary dense prediction "
    "(DenseVLM, CLIPSelf, Talk2DINO).",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["densevlm", "densevlm.*"]),
    package_data={"densevlm": ["models/model_configs/*.json", "vocab/data/*.json", "zoo/weights/manifest.json",
                               "zoo/weights/*.safetensors"]},
    include_package_data=True,
    install_requires=requirements,
    extras_require={"dev": ["pytest>=7.4"], "detectron2": []},
    entry_points={"console_scripts": ["densevlm=densevlm.cli:main"]},
    license="Apache-2.0",
)
