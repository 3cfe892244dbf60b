"""The API appendix (appendix/api*.md): constants and re-exported names.

A constant without a docstring of its own shows none: autodoc falls back to the docstring of the
value's type, so a dict constant would show ``dict.__doc__``, which says nothing about it.
"""


def _drop_type_docstrings(app, what, name, obj, options, lines):
    """autodoc-process-docstring: drop the docstring a constant has from its type."""
    if what in ("data", "attribute") and lines and getattr(obj, "__doc__", None) == type(obj).__doc__:
        lines.clear()


# A name a package re-exports (``refimpl.neon.Machine``, or ``Machine`` in refimpl.neon's
# docstrings) is documented once, in the module that defines it (``refimpl.neon.machine``):
# a reference to the re-exported name links there.

def _lookup(dotted):
    """The object a dotted name denotes, importing the longest module prefix; None if none."""
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for p in parts[i:]:
                obj = getattr(obj, p)
        except AttributeError:
            return None
        return obj
    return None


def _resolve_reexport(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip(".~")
    scopes = [node.get("py:module"), None]
    if node.get("py:class"):
        scopes.insert(0, f"{node.get('py:module')}.{node['py:class']}")
    domain = env.get_domain("py")
    for scope in scopes:
        name = f"{scope}.{target}" if scope else target
        if not name.startswith("refimpl"):
            continue
        obj = _lookup(name)
        if obj is None:
            continue
        real = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
        if isinstance(real[0], str) and isinstance(real[1], str):
            homes = [f"{real[0]}.{real[1]}"]
        else:   # a constant: the documented name whose value it is
            last = target.rpartition(".")[2]
            homes = [n for n in domain.objects if n.rpartition(".")[2] == last and _lookup(n) is obj]
        for home in homes:
            if home in domain.objects and home != name:
                return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], home,
                                           node, contnode)
    return None


def setup(app):
    app.connect("autodoc-process-docstring", _drop_type_docstrings)
    app.connect("missing-reference", _resolve_reexport)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
