import pytest

from tests.validation.planted import build_planted


@pytest.fixture(scope="session")
def planted(small_model_dir, calibration_dir, selection_dir, tmp_path_factory):
    return build_planted(small_model_dir, calibration_dir, selection_dir, tmp_path_factory.mktemp("planted"))
