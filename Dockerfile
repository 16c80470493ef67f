# GPU image: CUDA PyTorch base, the project installed, `python -m ldm_train` as entry point.
#   docker build -t ldm_train .
#   docker run --gpus all -v $PWD/data:/workspace/data -v $PWD/outputs:/workspace/outputs ldm_train stage=vae trainer=gpu
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/ldm_train
# The base image's torch and torchvision satisfy the ranges in pyproject.toml.
COPY pyproject.toml setup.py README.md ./
COPY conf conf
COPY ldm_train ldm_train
RUN pip install '.[metrics]'

# Runs write data/ and outputs/ under the working directory: mount them.
WORKDIR /workspace
ENTRYPOINT ["python", "-m", "ldm_train"]
CMD ["stage=clip", "trainer=gpu"]
