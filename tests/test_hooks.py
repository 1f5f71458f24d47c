"""Snapshot hooks without a database: the MySQL DSN translation keeps the password off argv."""
import pytest

import zrepl


def test_mysql_dsn_translation_keeps_password_off_argv():
    argv, env = zrepl.mysql_client_argv("root:s3cret@unix(/run/mysqld/mysqld.sock)/")
    assert "--socket=/run/mysqld/mysqld.sock" in argv and env == {"MYSQL_PWD": "s3cret"}
    assert not any("s3cret" in a for a in argv)
    argv, env = zrepl.mysql_client_argv("backup@tcp(db.example:3307)/mydb")
    assert "--host=db.example" in argv and "--port=3307" in argv and argv[-1] == "mydb"
    with pytest.raises(ValueError):
        zrepl.mysql_client_argv("garbage")
