FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 DJANGO_SETTINGS_MODULE=downpour.settings \
    PYTHONPATH=/app/platform:/app/agent
COPY pyproject.toml README.md manage.py ./
COPY agent ./agent
COPY platform ./platform
RUN pip install "./agent[tf]" ".[ml]"
# The admin's and the site's static files, served by WhiteNoise from STATIC_ROOT.
ENV STATIC_ROOT=/app/staticfiles
RUN python manage.py collectstatic --noinput
EXPOSE 8000
CMD ["daphne", "-b", "0.0.0.0", "-p", "8000", "downpour.asgi:application"]
