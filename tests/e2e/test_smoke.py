def test_psql_select(proxy):
    r = proxy.psql("-c", "SELECT count(*) FROM accounts")
    assert r.stdout.strip() == "100"
