// A Node.js 20 handler with a dependency (ms): main(event, context) may return a promise.
const ms = require("ms");

exports.main = async function (event, context) {
  const data = event.data || {};
  const millis = data.duration ? ms(String(data.duration)) : 0;
  console.log(`${context["function-name"]}: ${data.duration} is ${millis} ms`);
  return { duration: data.duration || null, milliseconds: millis };
};
