// The no-op job of the queue benchmark: the queue's own cost is measured.
module.exports = async () => {};
