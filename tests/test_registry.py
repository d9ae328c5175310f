import pytest

import dsnet


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError, match="unknown model 'resnet9000'; known models: .*ds_resnet50"):
        dsnet.create_model("resnet9000")


def test_unknown_argument_lists_accepted_ones():
    with pytest.raises(ValueError, match="unexpected keyword argument 'widht'.*accepted arguments: .*routing_space"):
        dsnet.create_model("ds_mobilenet_v1", widht=3)


def test_every_model_documents_itself():
    for name in dsnet.list_models():
        assert dsnet.models.model_info(name).description
