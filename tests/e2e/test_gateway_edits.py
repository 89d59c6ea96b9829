"""``POST /v1/images/edits`` through the official `openai` SDK, in front of the real tritonserver
(tiny pipeline, CPU): the edit is the servers' image for that input, OpenAI's mask arrives as
the servers' mask, refusals name the form's fields, and the playground's image upload."""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image, ImageDraw
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.e2e.gateway_process import KEYS
from tests.e2e.test_playground import browser  # noqa: F401 (fixture)
from zimage_client import ZImageClient

pytestmark = pytest.mark.e2e

SIZE = 64
# At strength 0.5 of four steps the image counts (tests/e2e/test_client_images.py says why).
EXTRAS = {"seed": 5, "num_inference_steps": 4}


def sdk(gateway, key: str = KEYS[0]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=120)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def photo() -> bytes:
    image = Image.new("RGB", (SIZE, SIZE), (70, 130, 220))
    ImageDraw.Draw(image).rectangle([0, SIZE // 2, SIZE - 1, SIZE - 1], fill=(40, 120, 50))
    return png(image)


def openai_mask() -> bytes:
    """Transparent (edit) over the lower half, opaque elsewhere: OpenAI's convention."""
    mask = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 255))
    ImageDraw.Draw(mask).rectangle([0, SIZE // 2, SIZE - 1, SIZE - 1], fill=(0, 0, 0, 0))
    return png(mask)


def repaint_lower_half() -> Image.Image:
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle([0, SIZE // 2, SIZE - 1, SIZE - 1], fill=255)
    return mask


def decoded(entry) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(entry.b64_json)))
    image.load()
    return np.asarray(image.convert("RGB"))


def direct(server, **kwargs) -> np.ndarray:
    with ZImageClient(server.grpc_url) as client:
        return np.asarray(client.generate(**kwargs).image.convert("RGB"))


def test_an_edit_is_the_servers_image_to_image(gateway, server):
    answer = sdk(gateway).images.edit(image=("photo.png", photo(), "image/png"), prompt="a lake at dawn",
                                      size=f"{SIZE}x{SIZE}", n=2, extra_body={**EXTRAS, "strength": 0.5})
    assert [entry.model_extra["seed"] for entry in answer.data] == [5, 6]
    for entry, seed in zip(answer.data, (5, 6)):
        expected = direct(server, prompt="a lake at dawn", image=photo(), strength=0.5, height=SIZE, width=SIZE,
                          seed=seed, num_inference_steps=4)
        np.testing.assert_array_equal(decoded(entry), expected)


def test_openais_mask_is_the_servers_inpainting_mask(gateway, server):
    answer = sdk(gateway).images.edit(image=("photo.png", photo(), "image/png"),
                                      mask=("mask.png", openai_mask(), "image/png"), prompt="a pond",
                                      extra_body=EXTRAS)
    (entry,) = answer.data
    expected = direct(server, prompt="a pond", image=photo(), mask=repaint_lower_half(), **EXTRAS)
    np.testing.assert_array_equal(decoded(entry), expected)
    unmasked = direct(server, prompt="a pond", image=photo(), **EXTRAS)
    assert not np.array_equal(decoded(entry), unmasked)


def test_a_list_of_one_image_is_served_and_two_are_refused(gateway):
    (entry,) = sdk(gateway).images.edit(image=[("a.png", photo(), "image/png")], prompt="a lake",
                                        extra_body=EXTRAS).data
    assert decoded(entry).shape == (SIZE, SIZE, 3)
    with pytest.raises(openai.BadRequestError) as raised:
        sdk(gateway).images.edit(image=[("a.png", photo(), "image/png"), ("b.png", photo(), "image/png")],
                                 prompt="two lakes")
    assert raised.value.body["param"] == "image" and "2 image files" in raised.value.message


@pytest.mark.parametrize("files, param", [
    ({"image": ("broken.png", photo()[:80], "image/png")}, "image"),  # refused by the server
    ({"image": ("photo.png", photo(), "image/png"),
      "mask": ("mask.png", png(Image.new("RGB", (SIZE, SIZE))), "image/png")}, "mask"),  # refused by the gateway
    ({"image": ("photo.png", photo(), "image/png"),
      "mask": ("mask.png", png(Image.new("LA", (SIZE * 2, SIZE))), "image/png")}, "mask"),  # by the server
])
def test_refusals_name_the_form_field(gateway, files, param):
    with pytest.raises(openai.BadRequestError) as raised:
        sdk(gateway).images.edit(prompt="a lake", extra_body=EXTRAS, **files)
    assert raised.value.body["param"] == param, raised.value.message
    assert raised.value.response.headers["x-should-retry"] == "false"


def test_edits_need_a_key(gateway):
    with pytest.raises(openai.AuthenticationError):
        sdk(gateway, "wrong-key-0123456789abcdef").images.edit(image=("in.png", photo(), "image/png"),
                                                             prompt="make it blue")


def test_the_playground_edits_a_chosen_image(browser, gateway, server, tmp_path):  # noqa: F811
    path = tmp_path / "photo.png"
    path.write_bytes(photo())
    browser.get(gateway.url + "/")
    browser.find_element(By.ID, "api-key").send_keys(KEYS[0])
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("a lake at dawn")
    Select(browser.find_element(By.ID, "size")).select_by_visible_text("64x64")
    for field, value in (("steps", "4"), ("seed", "5"), ("strength", "0.5")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    browser.find_element(By.ID, "image").send_keys(str(path))
    browser.find_element(By.ID, "generate").click()
    image = WebDriverWait(browser, 120).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#gallery figure img")))
    data = base64.b64decode(image.get_attribute("src").split(",", 1)[1])
    expected = direct(server, prompt="a lake at dawn", image=photo(), strength=0.5, height=SIZE, width=SIZE,
                      seed=5, num_inference_steps=4)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), expected)
