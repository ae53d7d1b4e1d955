"""Environment overrides of text settings stay text."""

from __future__ import annotations

import pytest

from immune import config as config_mod


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("IMMUNE_MQTT__PASSWORD", "123456"),
        ("IMMUNE_MQTT__USERNAME", "true"),
        ("IMMUNE_MQTT__CLIENT_ID", "2024-01-01"),
        ("IMMUNE_AGENT__ID", "1234"),
        ("IMMUNE_MQTT__TOPIC_PREFIX", "42"),
    ],
)
def test_config_env_text_setting_that_looks_like_toml_stays_text(
    name: str, value: str
) -> None:
    # TOML reads these as an integer, a boolean or a date, which a text
    # setting refused: "Expected `str | null`, got `int`".
    config = config_mod.load(environ={name: value})
    section, key = name.removeprefix("IMMUNE_").lower().split("__")
    assert getattr(getattr(config, section), key) == value


def test_config_env_typed_settings_are_still_read_as_toml() -> None:
    config = config_mod.load(
        environ={
            "IMMUNE_MQTT__KEEPALIVE": "45",
            "IMMUNE_MQTT__PERSISTENT_SESSION": "false",
            "IMMUNE_HIVE__DISABLED_PLUGINS": '["alert", "exploit"]',
            "IMMUNE_PLUGINS__ALERT__CONSOLE": "false",
        }
    )
    assert config.mqtt.keepalive == 45
    assert config.mqtt.persistent_session is False
    assert config.hive.disabled_plugins == ["alert", "exploit"]
    assert config.plugins["alert"] == {"console": False}
