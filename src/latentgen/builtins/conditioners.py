"""Built-in conditioners, registered through the same hook as third-party plugins."""

from latentgen.hookspecs import RegisterFn, hookimpl


@hookimpl
def register_conditioners(register: RegisterFn) -> None:
    from latentgen.conditioners.label import ClassLabelConditioner
    from latentgen.conditioners.pose import PoseConditioner
    from latentgen.conditioners.spatial import spatial_types

    register(ClassLabelConditioner)
    for cls in spatial_types():
        register(cls)
    register(PoseConditioner)
