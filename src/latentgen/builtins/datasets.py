"""Built-in datasets, registered through the same hook as third-party plugins."""

from latentgen.hookspecs import RegisterFn, hookimpl


@hookimpl
def register_datasets(register: RegisterFn) -> None:
    from latentgen.data.condition_maps import ConditionMapsDataset
    from latentgen.data.fashion_mnist import FashionMNIST
    from latentgen.data.folder import ImageFolderDataset
    from latentgen.data.paired import PairedFolderDataset
    from latentgen.data.shapes import ShapesDataset

    register(ShapesDataset)
    register(ImageFolderDataset)
    register(FashionMNIST)
    register(ConditionMapsDataset)
    register(PairedFolderDataset)
