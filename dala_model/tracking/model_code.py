"""The file MLflow logs "from code" for a dala checkpoint (see ``pyfunc``): no pickle involved."""

from mlflow.models import set_model

from dala_model.tracking.pyfunc import DalaCheckpoint

set_model(DalaCheckpoint())
