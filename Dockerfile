# One image for every clv process (consumers, archiver, trainer, API); the command picks the role.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY clv clv
COPY consumers consumers
COPY feature_store feature_store
COPY service service
COPY training training
RUN pip install --no-cache-dir .
# /data is where compose mounts the event log and models: a new named volume takes the owner
# of the image's folder, so nobody (the user below) can write there.
RUN mkdir -p /data && chown nobody /data
USER nobody
ENTRYPOINT ["clv"]
