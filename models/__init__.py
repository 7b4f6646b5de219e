"""The built-in model packages (data only), installed as ``vialinspect.models``.

``default/`` is the committed default model package; recipes and commands name it ``builtin:default``
(see ``vialinspect.export.builtin``). ``make model`` reproduces it.
"""
