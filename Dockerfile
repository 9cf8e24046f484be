# danube in the NGC PyTorch container: CUDA, NCCL, Transformer Engine (FP8) and apex come
# with the image; we add megatron-core 0.16 and our package.
#   docker build -t danube .
#   docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:25.06-py3 -t danube .  # R535/R550
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#     -v /data:/data -v $PWD/results:/workspace/danube/results danube \
#     torchrun --nproc_per_node 8 launchers/pretrain.py --config-name danube_1.8b
#
# BASE_IMAGE: megatron-core 0.16 is tested by NVIDIA on 25.11-py3 (dev) and 25.09-py3 (LTS),
# Transformer Engine >= 2.9, CUDA 13 (needs an R580+ driver). On clusters with older drivers use
# 25.06-py3 (TE 2.4, the last CUDA 12 image): it works but is below the TE that 0.16 is tested
# with.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.11-py3
FROM ${BASE_IMAGE}

# megatron-core's tensor-parallel communication overlap needs kernels queued in order.
ENV CUDA_DEVICE_MAX_CONNECTIONS=1

WORKDIR /workspace/danube
# Dependencies first, for layer caching; the image's own torch satisfies `torch>=2.6`. The build
# fails if pip replaced the image's torch or Transformer Engine (docker/image_stack.py).
COPY pyproject.toml README.md ./
COPY danube/__init__.py danube/__init__.py
COPY docker/image_stack.py docker/image_stack.py
RUN python docker/image_stack.py record /tmp/image-stack.json \
 && pip install --no-cache-dir -e ".[test]" \
 && python docker/image_stack.py verify /tmp/image-stack.json
COPY . .
RUN pip install --no-cache-dir --no-deps -e . \
 && python docker/image_stack.py verify /tmp/image-stack.json \
 && python -c "import danube.config, megatron.core; print('megatron-core', megatron.core.__version__)"

CMD ["python", "launchers/pretrain.py"]
