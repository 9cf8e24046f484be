# danube in the NGC PyTorch container: CUDA, NCCL, Transformer Engine (FP8) and apex come
# with the image; we add megatron-core 0.16 and our package.
#   docker build -t danube .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#     -v /data:/data -v $PWD/results:/workspace/danube/results danube \
#     torchrun --nproc_per_node 8 launchers/pretrain.py --config-name danube_1.8b
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.06-py3
FROM ${BASE_IMAGE}

WORKDIR /workspace/danube
# Dependencies first, for layer caching; the image's own torch satisfies `torch>=2.6`.
COPY pyproject.toml README.md ./
COPY danube/__init__.py danube/__init__.py
RUN pip install --no-cache-dir -e ".[test]"
COPY . .
RUN pip install --no-cache-dir --no-deps -e . \
 && python -c "import danube.config, megatron.core; print('megatron-core', megatron.core.__version__)"

CMD ["python", "launchers/pretrain.py"]
