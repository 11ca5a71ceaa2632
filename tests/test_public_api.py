"""The package's public surface is what it says it is: everything else is private."""

import gateway


def test_public_exports():
    assert sorted(gateway.__all__) == ["GatewayError", "Policy", "__version__"]
    for name in gateway.__all__:
        assert hasattr(gateway, name)
    public_modules = [name for name in dir(gateway)
                      if not name.startswith("_") and name not in gateway.__all__]
    assert public_modules in ([], ["upstreams"])
