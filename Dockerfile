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
USER nobody
ENTRYPOINT ["clv"]
