"""One CGD global descriptor: SPoC, MAC or GeM pooling followed by an FC layer."""

import keras

from delg_tf.layers.gem_pooling import DEFAULT_GEM_POWER, GeMPooling
from delg_tf.ops import pooling

# CGD's one-letter descriptor codes.
DESCRIPTOR_POOLINGS = {"S": "spoc", "M": "mac", "G": "gem"}


def parse_descriptor_codes(spec):
    """'G,M', 'GM' or ['G', 'M'] -> ('G', 'M'); validates the letters.

    Raises:
      ValueError: unknown or repeated letters, or none.
    """
    if isinstance(spec, str):
        letters = [c for c in spec.upper() if c not in ", +"]
    else:
        letters = [str(c).upper() for c in spec]
    unknown = [c for c in letters if c not in DESCRIPTOR_POOLINGS]
    if not letters or unknown or len(set(letters)) != len(letters):
        raise ValueError(
            f"global descriptors must be distinct letters of "
            f"{sorted(DESCRIPTOR_POOLINGS)} such as 'G,M' (GeM + MAC, the paper's "
            f"best), received {spec!r}."
        )
    return tuple(letters)


class GlobalDescriptor(keras.layers.Layer):
    """A pooled global descriptor followed by a bias-free fully connected layer.

    Args:
      code: "S" (SPoC, average), "M" (MAC, max) or "G" (GeM).
      units: output dimension of the FC layer; None or 0 for no FC.
      gem_power: GeM power p (only for "G").
      learn_gem_power: make p trainable (only for "G").

    Input shape: [B, H, W, C].
    Output of `call`: (pooled [B, C], descriptor [B, units or C]).

    Reference: Jun et al., "Combination of Multiple Global Descriptors for Image
    Retrieval" (CGD), arXiv:1903.10663, Sec. 3.1; Kim, Kim, Suh, "Glocal Retriever",
    Electronics 2023, Sec. 3.2.
    """

    def __init__(
        self, code, units=None, gem_power=DEFAULT_GEM_POWER, learn_gem_power=False, **kwargs
    ):
        super().__init__(**kwargs)
        code = str(code).upper()
        if code not in DESCRIPTOR_POOLINGS:
            raise ValueError(
                f"GlobalDescriptor code must be one of {sorted(DESCRIPTOR_POOLINGS)}, "
                f"received {code!r}."
            )
        self.code = code
        self.units = int(units) if units else None
        self.gem_power = float(gem_power)
        self.learn_gem_power = bool(learn_gem_power)
        self.gem = (
            GeMPooling(power=self.gem_power, learn_power=self.learn_gem_power, name="gem")
            if code == "G"
            else None
        )
        self.fc = keras.layers.Dense(self.units, use_bias=False, name="fc") if self.units else None

    def build(self, input_shape):
        if self.gem is not None:
            self.gem.build(input_shape)
        if self.fc is not None:
            self.fc.build((input_shape[0], input_shape[-1]))
        self.built = True

    def call(self, x):
        if self.gem is not None:
            pooled = self.gem(x)
        else:
            pooled = pooling.POOLING_FUNCTIONS[DESCRIPTOR_POOLINGS[self.code]](x)
        return pooled, (self.fc(pooled) if self.fc is not None else pooled)

    def get_config(self):
        config = super().get_config()
        config.update(
            code=self.code,
            units=self.units,
            gem_power=self.gem_power,
            learn_gem_power=self.learn_gem_power,
        )
        return config
