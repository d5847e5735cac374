"""Ray Serve deployment of the service (`serve run docker/ray/serve_config.yaml`; docs/ray-serve.md).

`build_app` is the Serve config's import path (`app.ray_serve:build_app`); `VarServe` the deployment.
Needs the `ray` extra (`pip install -e '.[ray]'`). Nothing in the product imports this package.
"""

from app.ray_serve.deployment import DEPLOYMENT_NAME, RayServeArgs, VarServe, build_app, deployment_options

__all__ = ["DEPLOYMENT_NAME", "RayServeArgs", "VarServe", "build_app", "deployment_options"]
