"""TF Serving warm-up records without tensorflow-serving-api.

TF Serving replays `assets.extra/tf_serving_warmup_requests` (a TFRecord file of
`tensorflow.serving.PredictionLog` protos) when it loads a model, so the first
real request does not pay for graph initialisation. tensorflow-serving-api is not
a dependency of delg_tf, so the few messages needed are encoded here directly in
the protobuf wire format (field numbers from tensorflow_serving/apis):

    PredictionLog { PredictLog predict_log = 6; }
    PredictLog    { PredictRequest request = 1; PredictResponse response = 2; }
    PredictRequest { ModelSpec model_spec = 1; map<string, TensorProto> inputs = 2; }
    ModelSpec     { string name = 1; string signature_name = 3; }
    map entry     { string key = 1; TensorProto value = 2; }

`decode_prediction_log` parses them back (used by the tests and for debugging).
"""

import tensorflow as tf

from delg_tf.extraction.config import ASSETS_EXTRA_DIR

# The warm-up file sits next to the export's DelfConfig asset.
WARMUP_DIR = ASSETS_EXTRA_DIR
WARMUP_FILE = "tf_serving_warmup_requests"

_WIRE_VARINT = 0
_WIRE_LENGTH_DELIMITED = 2
_PREDICTION_LOG_PREDICT_LOG = 6
_PREDICT_LOG_REQUEST = 1
_PREDICT_REQUEST_MODEL_SPEC = 1
_PREDICT_REQUEST_INPUTS = 2
_MODEL_SPEC_NAME = 1
_MODEL_SPEC_SIGNATURE_NAME = 3
_MAP_KEY = 1
_MAP_VALUE = 2
_VARINT_PAYLOAD_BITS = 7
_VARINT_PAYLOAD_MASK = 0x7F
_VARINT_CONTINUATION = 0x80
_TAG_WIRE_TYPE_BITS = 3
_TAG_WIRE_TYPE_MASK = 0x7


def _varint(value):
    out = bytearray()
    while True:
        byte = value & _VARINT_PAYLOAD_MASK
        value >>= _VARINT_PAYLOAD_BITS
        if value:
            out.append(byte | _VARINT_CONTINUATION)
        else:
            out.append(byte)
            return bytes(out)


def _field(number, payload):
    """A length-delimited field (wire type 2)."""
    tag = (number << _TAG_WIRE_TYPE_BITS) | _WIRE_LENGTH_DELIMITED
    return _varint(tag) + _varint(len(payload)) + payload


def encode_predict_request(inputs, signature_name, model_name=""):
    """Serialized PredictRequest.

    Args:
      inputs: dict input name -> numpy array / tensor / `TensorProto`.
      signature_name: signature to call.
      model_name: ModelSpec.name (TF Serving ignores it for warm-up).

    Returns:
      bytes.
    """
    spec = _field(_MODEL_SPEC_NAME, model_name.encode("utf-8")) + _field(
        _MODEL_SPEC_SIGNATURE_NAME, signature_name.encode("utf-8")
    )
    message = _field(_PREDICT_REQUEST_MODEL_SPEC, spec)
    for key in sorted(inputs):
        value = inputs[key]
        proto = value if hasattr(value, "SerializeToString") else tf.make_tensor_proto(value)
        entry = _field(_MAP_KEY, key.encode("utf-8")) + _field(
            _MAP_VALUE, proto.SerializeToString()
        )
        message += _field(_PREDICT_REQUEST_INPUTS, entry)
    return message


def encode_prediction_log(inputs, signature_name, model_name=""):
    """Serialized PredictionLog wrapping one PredictRequest (a warm-up record)."""
    request = encode_predict_request(inputs, signature_name, model_name)
    return _field(_PREDICTION_LOG_PREDICT_LOG, _field(_PREDICT_LOG_REQUEST, request))


def _parse_fields(data):
    """Yields (field number, wire type, payload) of a serialized message."""
    pos = 0
    while pos < len(data):
        tag, pos = _read_varint(data, pos)
        number, wire = tag >> _TAG_WIRE_TYPE_BITS, tag & _TAG_WIRE_TYPE_MASK
        if wire == _WIRE_LENGTH_DELIMITED:
            length, pos = _read_varint(data, pos)
            yield number, wire, data[pos : pos + length]
            pos += length
        elif wire == _WIRE_VARINT:
            value, pos = _read_varint(data, pos)
            yield number, wire, value
        else:
            raise ValueError(
                f"unsupported wire type {wire} in a warm-up record "
                "(expected only varint and length-delimited fields)."
            )


def _read_varint(data, pos):
    result, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & _VARINT_PAYLOAD_MASK) << shift
        if not byte & _VARINT_CONTINUATION:
            return result, pos
        shift += _VARINT_PAYLOAD_BITS


def decode_prediction_log(data):
    """Parses a serialized PredictionLog written by `encode_prediction_log`.

    Returns:
      (signature_name, {input name: numpy array}).
    """
    ((number, _, predict_log),) = [f for f in _parse_fields(data)]
    if number != _PREDICTION_LOG_PREDICT_LOG:
        raise ValueError(f"expected PredictionLog.predict_log (field 6), found field {number}.")
    request = next(p for n, _, p in _parse_fields(predict_log) if n == _PREDICT_LOG_REQUEST)
    signature_name, inputs = "", {}
    for number, _, payload in _parse_fields(request):
        if number == _PREDICT_REQUEST_MODEL_SPEC:
            for n, _, value in _parse_fields(payload):
                if n == _MODEL_SPEC_SIGNATURE_NAME:
                    signature_name = value.decode("utf-8")
        elif number == _PREDICT_REQUEST_INPUTS:
            fields = {n: value for n, _, value in _parse_fields(payload)}
            proto = tf.make_tensor_proto(0)
            proto.ParseFromString(fields[_MAP_VALUE])
            inputs[fields[_MAP_KEY].decode("utf-8")] = tf.make_ndarray(proto)
    return signature_name, inputs


def write_warmup_file(saved_model_dir, requests):
    """Writes `assets.extra/tf_serving_warmup_requests`.

    Args:
      saved_model_dir: the SavedModel directory.
      requests: list of (signature_name, inputs dict).

    Returns:
      Path string of the written file.
    """
    directory = tf.io.gfile.join(str(saved_model_dir), WARMUP_DIR)
    tf.io.gfile.makedirs(directory)
    path = tf.io.gfile.join(directory, WARMUP_FILE)
    with tf.io.TFRecordWriter(path) as writer:
        for signature_name, inputs in requests:
            writer.write(encode_prediction_log(inputs, signature_name))
    return path
